"""Whether a change left the compiled programs of a model as they were: the optimized XLA:CPU
HLO of its forward pass, train-step gradient and decode step, compiled by this checkout and by
git revision REV (checked out to a temporary worktree), compared after dropping source
locations. Identical programs run identically fast, which no benchmark's noise can say as
sharply.

  python -m bench.same_program REV [--preset mistral-15m]

(The printed digests are those of each program's text; a difference prints where it starts.)
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child process whose sys.path starts at the checkout being measured.
PROGRAMS = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp
from mistral_jax.model.cache import KVCache
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral, init_params
from mistral_jax.training import trainer

c = MistralConfig.preset(sys.argv[2])
params = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
forward = jax.jit(lambda p, t: Mistral(c).apply({"params": p}, t)).lower(params, tokens)
batch = jax.ShapeDtypeStruct((2, 257), jnp.int32)
gradient = jax.jit(jax.grad(lambda p, b: trainer.loss_fn(p, c, b, 0.0)[0])).lower(params, batch)
cache = jax.eval_shape(lambda: KVCache.init(c, 2, 512))
one = jax.ShapeDtypeStruct((2, 1), jnp.int32)
decode = jax.jit(lambda p, t, pos, k: Mistral(c).apply({"params": p}, t, pos, k)).lower(params, one, one, cache)
for name, lowered in (("forward", forward), ("gradient", gradient), ("decode", decode)):
    with open(os.path.join(sys.argv[3], name + ".hlo"), "w") as f:
        f.write(lowered.compile().as_text())
'''


def normalized(text: str) -> str:
    """The program without what names the checkout: metadata, source locations, module name."""
    text = re.sub(r"metadata=\{[^}]*\}", "", text)
    text = re.sub(r"^\d+ .*$\n", "", text, flags=re.M)  # the file/function/frame tables
    text = re.sub(r",? ?stack_frame_id=\d+", "", text)
    return re.sub(r"HloModule \S+", "HloModule m", text)


def programs(checkout: str, preset: str, out: str) -> dict[str, str]:
    os.makedirs(out)
    subprocess.run([sys.executable, "-c", PROGRAMS, checkout, preset, out], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return {name[:-4]: normalized(open(os.path.join(out, name)).read()) for name in sorted(os.listdir(out))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare with, e.g. HEAD~1 or main")
    p.add_argument("--preset", default="mistral-15m")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = os.path.join(tmp, "checkout")
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "--quiet", other, args.rev], check=True)
        try:
            before, after = programs(other, args.preset, os.path.join(tmp, "before")), programs(
                REPO, args.preset, os.path.join(tmp, "after"))
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", other], check=True)
    same = True
    for name in before:
        digests = [hashlib.sha256(program[name].encode()).hexdigest()[:16] for program in (before, after)]
        print(f"{args.preset} {name}: {args.rev} {digests[0]}, this checkout {digests[1]}: "
              f"{'identical' if digests[0] == digests[1] else 'DIFFERENT'}")
        if digests[0] != digests[1]:
            same = False
            diff = difflib.unified_diff(before[name].splitlines(), after[name].splitlines(), lineterm="", n=1)
            print("\n".join(list(diff)[:20]))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
