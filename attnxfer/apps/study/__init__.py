"""`attnxfer study`: K students from one teacher in one job, and the study's report."""
