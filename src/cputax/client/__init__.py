"""The streaming client: SSE parsing, one request -> RequestRecord, calibration."""
