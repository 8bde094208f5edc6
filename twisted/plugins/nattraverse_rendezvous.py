from twisted.application.service import ServiceMaker

natrendezvous = ServiceMaker(
    "nattraverse rendezvous",
    "nattraverse.tap",
    "STUN, rendezvous and relay for nattraverse peers",
    "natrendezvous",
)
