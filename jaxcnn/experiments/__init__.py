"""Short, re-runnable experiments that back claims made in the docs."""
