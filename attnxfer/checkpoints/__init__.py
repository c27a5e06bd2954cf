"""attnxfer.checkpoints"""
