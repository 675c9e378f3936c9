"""Arrow schemas and the manifest model. Imports nothing else of ours."""
