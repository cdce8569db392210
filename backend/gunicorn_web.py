"""gunicorn settings of the web processes alone: `rlhf-backend serve --no-worker`, for a deployment whose
training workers run elsewhere (`rlhf-backend worker` on other machines, the compose file's worker)."""

bind = "127.0.0.1:9090"
workers = 2
timeout = 120  # /predict may embed many candidates; Label Studio itself waits 100 s
