"""Security layers: prompt policy, output classifiers, provenance, audit (see the README)."""
