"""Data builders: programs that write a task's files once (`kdtw data ...`).

Only the `kdtw data` command imports these modules, and lazily; training (kdtw.local,
kdtw.factory, the Ray jobs and actors) never does: it reads the files they wrote.
"""
