"""``python -m dualglow_app.evaluate``: the ``dualglow-evaluate`` command without installing it."""

from dualglow_app.cli.evaluate import main

if __name__ == "__main__":
    main()
