"""Scripts here run in the client venvs, never in Amber's pytest. langchain_standard/ is a pytest
module for the langchain-tests venv's own pytest (tests/api/test_langchain_standard.py runs it)."""
collect_ignore = ["langchain_standard"]
