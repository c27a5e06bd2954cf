"""attnxfer.models"""
