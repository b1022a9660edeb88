"""OrthoReg inside the training frameworks people already use (ultralytics, ...)."""
