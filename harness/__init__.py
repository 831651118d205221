"""The harness: CLI, run configuration, protocol, measurements, results, leaderboards, model loading."""
