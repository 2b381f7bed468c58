"""Operator tools that are not part of the daemon (lab certificates, ...)."""
