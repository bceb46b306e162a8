"""The web dashboard every agent serves under /ui/ (pleaco/ui/pages.py).

Server-rendered page shells with small vanilla JavaScript modules (pleaco/ui/static, no build
step, shipped in the wheel): every action a page takes is a call to the same /v1 handlers the
CLI uses, authenticated by the session cookie the login form sets (pleaco/ui/session.py).
"""
