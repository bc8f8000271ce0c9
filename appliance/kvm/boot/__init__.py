"""kvm/boot"""
