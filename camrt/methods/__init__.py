"""Built-in explanation methods, one module each, registered through the `register_methods` hook."""
