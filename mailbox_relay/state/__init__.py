"""The SQLite state, opened one way (store.py): import's journal and fetch/watch's folders."""
