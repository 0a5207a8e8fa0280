"""Thin Ray wrappers around `kdtw` objects, one file per role (DESIGN.md §7): each builds its
`kdtw` object in ``__init__`` and forwards a few methods; resources come from config through
``.options(...)`` (:func:`actors.common.options`). No maths here."""
