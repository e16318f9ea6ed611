"""Profiles, drift, online performance; the sensors and schedules that close the loop."""
