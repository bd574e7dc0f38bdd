"""Reading, writing, resampling and showing images; sample data and cohorts."""
