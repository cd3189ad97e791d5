"""The labelling web app: people rank sampled responses; their labels become preference pairs.

store (SQLite project) <- auth (tokens), labels (what a request says), assign (who labels what), agreement,
report, export (files for the reward stage and DPO) <- app (FastAPI; imported only by `rlhfkit label serve`)
<- commands (`rlhfkit label ...`). Nothing here imports FastAPI or uvicorn except app.py and the serve command.
"""
