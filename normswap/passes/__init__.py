"""Data-driven passes: batches in, statistics or fitted affines out (lockstep forwards, moments, AdaBN, calibration)."""
