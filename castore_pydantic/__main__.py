"""``python -m castore_pydantic``: the ``castore`` command-line tool (needs the ``cli`` extra)."""

from castore_pydantic.cli import main

if __name__ == "__main__":
    main()
