"""attnxfer.launch"""
