"""Generation: settings, sampling, the compiled decode loop, stop strings and streaming."""
