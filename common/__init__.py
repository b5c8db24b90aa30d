"""Shared foundation of IDunno: config, wire protocol, transport helpers, membership, logging.

This package imports nothing else of the project (it is the bottom layer).
"""
