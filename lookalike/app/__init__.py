"""The app side of Lookalike: a Python client of the public endpoint (`client`), the try page
(`try_page`, static files in `web/`), both servers on one machine (`serving_stack`), and the main job on
the embedded defaults (`demo`)."""
