"""Throughput measurements of this machine, as ``pcav bench`` reports them (not tests)."""
