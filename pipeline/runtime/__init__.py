"""Plain classes behind the Ray actors (actors/): one rank of a worker group, one video's scheduler,
the block writer, checkpoints and progress. No Ray imports here: tests drive them in-process."""
