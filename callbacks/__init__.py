"""Lightning callbacks: sample grids, fusion and IQA metrics, data-mix monitoring."""
