"""Protection-group policies: the models of one policy file, loading the policy directory, and
which snapshots a retention rule keeps.

- :mod:`dvx_dr.policies.model`: the pydantic models and the :class:`Schedule` value type.
- :mod:`dvx_dr.policies.loader`: one file, a whole directory, and the volumes of a group.
- :mod:`dvx_dr.policies.retention`: grandfather-father-son selection of snapshots to keep.

The scheduler and the CLI import this package; it imports neither.
"""
