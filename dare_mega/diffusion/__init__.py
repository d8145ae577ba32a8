"""Block-diffusion machinery shared by training and log-prob estimation: masks, two-stream layout, attention."""
