"""Amber: a self-hosted language-model studio that speaks AI21 Studio's J2 API."""
