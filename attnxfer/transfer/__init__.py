"""attnxfer.transfer"""
