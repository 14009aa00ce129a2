"""Built-in tools. Importing `workers.tools.builtin` registers DELAY and HTTP_GET_JSON."""
