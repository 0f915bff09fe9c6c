"""Plain types every room shares. Standard library and pydicom only."""
