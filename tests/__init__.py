"""Tests, laid out like the package. Packages (each folder has an __init__.py), so modules import as
`tests.<folder>.<module>` and helpers as `from tests.helpers import ...` whatever the basenames."""
