"""`attnxfer inspect`: attention agreement of students with their teacher, its report and pictures."""
