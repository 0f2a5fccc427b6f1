"""What the rest runs on, knowing nothing of the model: options and command lines, the platform
policy (CPU, GPU, TPU), several processes as one program, locks, the device mesh and its
sharding rules."""
