"""qcow2"""
