"""Calls: the orchestrator (one state machine per call) and live updates for watchers."""
