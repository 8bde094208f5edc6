from nattraverse._parsers import PunchClientParser, PunchServerParser

punchClient = PunchClientParser()
punchServer = PunchServerParser()
