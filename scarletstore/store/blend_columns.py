"""Names of the blend-table columns and the ``--where`` grammar summary.

Kept apart from :mod:`scarletstore.store.query` (numpy, pandas) so the command line
can print them in its help without importing the numerical stack.
"""

#: run variable -> blend-table column
BLEND_COLUMNS = {
    "blend_parent_id": "parent", "blend_n_peaks": "n_peaks", "blend_n_sources": "n_sources",
    "blend_iterations": "iterations", "blend_log_likelihood": "log_likelihood",
    "blend_chi2": "chi2", "blend_converged": "converged", "blend_runtime": "runtime",
    "blend_flags": "flags", "blend_y0": "y0", "blend_x0": "x0", "blend_height": "height",
    "blend_width": "width", "blend_reason": "reason",
}

WHERE_GRAMMAR = (
    "column names, numbers (3, -2.5, 1e-3), quoted strings ('isolated'), True/False, "
    "== != < <= > >=, and/or/not, parentheses, and 'in'/'not in' with a list like [1, 2]")
