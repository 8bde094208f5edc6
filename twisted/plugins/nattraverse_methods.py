from nattraverse.methods.direct import DirectMethod
from nattraverse.methods.relay import RelayMethod
from nattraverse.methods.reversal import ReversalMethod
from nattraverse.methods.udp import UdpMethod

direct = DirectMethod()
reversal = ReversalMethod()
udp = UdpMethod()
relay = RelayMethod()
