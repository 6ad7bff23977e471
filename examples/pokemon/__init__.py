"""The Pokémon example: two event stores, commands, and an event group across both.

Run it with ``python -m examples.pokemon``; each run continues the story of the last one,
because the events live in a SQLite file (``pokemon.db`` unless ``--db`` or
``POKEMON_DB`` says otherwise).
"""
