"""The benchmark: the method x concept grid, the comparison table and the HTML report."""
