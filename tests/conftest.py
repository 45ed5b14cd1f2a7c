"""Make the flat top-level modules (model, losses, data, train, eval) and tests/tiny.py importable."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
