"""What is not the platform itself: the CLI, the simulator, traffic, the local Ray head, status."""
