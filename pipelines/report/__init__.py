"""What a person reads: the run summary, console tables, progress bars, plots."""
