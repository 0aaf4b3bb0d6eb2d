"""The review service: people resolve verification exceptions in a web app."""
