"""Infrastructure apart from the lessons: HTTP chat client and response cache (`chat`), the data-generation
runs (`rewrite`: stage 1 on a thread pool and the command line; `arc`: self-training and the paper's arc)."""
