"""Hand-written radiology sentences / short reports with their expected CheXpert labels.

Written in the style of IU-Xray and MIMIC-CXR reports (real phrasing, not templates) to test and
benchmark ``fedmrg.data.labeler``. Each case is ``(text, expected)`` or ``(text, expected,
xfail_reason)``; ``expected`` names only the observations that are not blank.

No finding is always explicit: ``NF: POS`` when nothing but support devices (and no other
abnormality such as emphysema, granuloma, scoliosis) is positive or uncertain, ``NF: BLANK``
otherwise (CheXpert never codes No finding negative). Conventions (see the labeler's docstring):
"lungs are clear" -> lung opacity negative; "no new X" -> X uncertain; "X or Y" -> both
uncertain; "vascular congestion" -> edema uncertain; "upper limits of normal" / "borderline"
heart size -> cardiomegaly uncertain; "stable heart size / cardiomediastinal silhouette" ->
uncertain; blunted costophrenic angle -> effusion uncertain; healed fractures -> positive.
"""

from __future__ import annotations

BLANK, POS, NEG, UNC = 0, 1, 2, 3

ECM = "enlarged cardiomediastinum"
CM = "cardiomegaly"
OPAC = "lung opacity"
LES = "lung lesion"
EDEMA = "edema"
CONS = "consolidation"
PNA = "pneumonia"
ATEL = "atelectasis"
PTX = "pneumothorax"
EFF = "pleural effusion"
PO = "pleural other"
FX = "fracture"
SD = "support devices"
NF = "no finding"

CASES: list[tuple] = [
    # ------------------------------------------------------------------ normal studies
    (
        "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
        {CM: NEG, ECM: NEG, OPAC: NEG, NF: POS},
    ),
    (
        "Heart size normal. Lungs are clear. XXXX are normal. No pneumonia, effusions, edema, "
        "pneumothorax, adenopathy, nodules or masses.",
        {CM: NEG, OPAC: NEG, PNA: NEG, EFF: NEG, EDEMA: NEG, PTX: NEG, LES: NEG, NF: POS},
    ),
    (
        "The cardiomediastinal silhouette is within normal limits for size and contour. The lungs "
        "are normally inflated without evidence of focal airspace disease, pleural effusion, or "
        "pneumothorax. Osseous structures are within normal limits for patient age.",
        {ECM: NEG, OPAC: NEG, EFF: NEG, PTX: NEG, FX: NEG, NF: POS},
    ),
    ("No acute cardiopulmonary abnormality.", {NF: POS}),
    ("No acute cardiopulmonary process.", {NF: POS}),
    ("Normal chest radiograph.", {NF: POS}),
    ("NO ACUTE CARDIOPULMONARY ABNORMALITY.", {NF: POS}),
    ("No radiographic evidence of acute cardiopulmonary disease.", {NF: POS}),
    (
        "PA and lateral views of the chest were obtained. The lungs are well expanded and clear. "
        "There is no focal consolidation, pleural effusion, or pneumothorax. The "
        "cardiomediastinal silhouette is normal.",
        {OPAC: NEG, CONS: NEG, EFF: NEG, PTX: NEG, ECM: NEG, NF: POS},
    ),
    (
        "Lungs are clear bilaterally. Heart and mediastinum are within normal limits. No bony "
        "abnormality.",
        {OPAC: NEG, CM: NEG, ECM: NEG, FX: NEG, NF: POS},
    ),
    (
        "Frontal and lateral views of the chest demonstrate normal heart size and mediastinal "
        "contours. Clear lungs. No pleural effusion or pneumothorax.",
        {CM: NEG, ECM: NEG, OPAC: NEG, EFF: NEG, PTX: NEG, NF: POS},
    ),
    (
        "No acute findings. The heart size and pulmonary vascularity appear within normal limits.",
        {CM: NEG, EDEMA: NEG, NF: POS},
    ),
    (
        "The lungs and pleural spaces are clear. Cardiac and mediastinal contours are normal.",
        {OPAC: NEG, EFF: NEG, PTX: NEG, CM: NEG, ECM: NEG, NF: POS},
    ),
    (
        "Heart size is normal. No focal airspace opacity to suggest pneumonia. The costophrenic "
        "angles are sharp. No acute bony abnormality.",
        {CM: NEG, OPAC: NEG, PNA: NEG, EFF: NEG, FX: NEG, NF: POS},
    ),
    (
        "FINDINGS: PA and lateral views of the chest provided. There is no focal consolidation, "
        "effusion, or pneumothorax. The cardiomediastinal silhouette is normal. Imaged osseous "
        "structures are intact. No free air below the right hemidiaphragm is seen.\n"
        "IMPRESSION: No acute intrathoracic process.",
        {CONS: NEG, EFF: NEG, PTX: NEG, ECM: NEG, FX: NEG, NF: POS},
    ),
    (
        "INDICATION: Cough, fever, evaluate for pneumonia.\nCOMPARISON: None.\n"
        "FINDINGS: The lungs are clear. Heart size is normal.\nIMPRESSION: Normal chest.",
        {OPAC: NEG, CM: NEG, NF: POS},
    ),
    (
        "Normal heart size. Negative for focal consolidation, effusion or pneumothorax.",
        {CM: NEG, CONS: NEG, EFF: NEG, PTX: NEG, NF: POS},
    ),
    (
        "Lungs are hyperexpanded but clear. No focal consolidation. Heart size normal.",
        {OPAC: NEG, CONS: NEG, CM: NEG, NF: BLANK},
    ),
    ("Heart is not enlarged. No pleural effusion is seen.", {CM: NEG, EFF: NEG, NF: POS}),
    (
        "Clear lungs without focal consolidation, edema, effusion, or pneumothorax.",
        {OPAC: NEG, CONS: NEG, EDEMA: NEG, EFF: NEG, PTX: NEG, NF: POS},
    ),
    (
        "The heart, lungs, hila, mediastinum, and pleural surfaces are within normal limits.",
        {CM: NEG, OPAC: NEG, ECM: NEG, EFF: NEG, PTX: NEG, NF: POS},
    ),
    (
        "The cardiac silhouette and mediastinal contours are within normal limits. The lungs are "
        "free of focal airspace disease. No pleural effusion or pneumothorax is seen.",
        {CM: NEG, ECM: NEG, OPAC: NEG, EFF: NEG, PTX: NEG, NF: POS},
    ),
    (
        "Patient is rotated. Lungs are grossly clear. No large pneumothorax.",
        {OPAC: NEG, PTX: NEG, NF: POS},
    ),
    ("No signs of CHF or pneumonia.", {EDEMA: NEG, PNA: NEG, NF: POS}),
    (
        "Heart size and mediastinal contours are within normal limits. Pulmonary vasculature is "
        "normal. No focal consolidation, pleural effusion or pneumothorax. Visualized osseous "
        "structures are unremarkable.",
        {CM: NEG, ECM: NEG, EDEMA: NEG, CONS: NEG, EFF: NEG, PTX: NEG, FX: NEG, NF: POS},
    ),
    (
        "Comparison is made to the previous study. The lungs remain clear and the heart size is "
        "normal.",
        {OPAC: NEG, CM: NEG, NF: POS},
    ),
    # ------------------------------------------------------------------ enlarged cardiomediastinum
    ("The mediastinum is widened.", {ECM: POS, NF: BLANK}),
    (
        "Widening of the superior mediastinum, which may be related to vascular structures given "
        "AP technique.",
        {ECM: POS, NF: BLANK},
    ),
    ("Mediastinal contours are normal.", {ECM: NEG, NF: POS}),
    (
        "Enlarged cardiomediastinal silhouette, accentuated by the AP portable technique.",
        {ECM: POS, NF: BLANK},
    ),
    ("Stable appearance of the cardiomediastinal silhouette.", {ECM: UNC, NF: BLANK}),
    (
        "Mediastinal widening is concerning for aortic injury in the setting of trauma.",
        {ECM: POS, NF: BLANK},
    ),
    ("The mediastinal silhouette is not widened.", {ECM: NEG, NF: POS}),
    (
        "Possible mediastinal widening, although this may be due to patient rotation.",
        {ECM: UNC, NF: BLANK},
    ),
    ("Unchanged widened mediastinum.", {ECM: POS, NF: BLANK}),
    ("Cardiomediastinal contours are within normal limits.", {ECM: NEG, NF: POS}),
    ("The superior mediastinum is mildly prominent.", {ECM: UNC, NF: BLANK}),
    # ------------------------------------------------------------------ cardiomegaly
    ("Moderate cardiomegaly.", {CM: POS, NF: BLANK}),
    ("The heart is enlarged.", {CM: POS, NF: BLANK}),
    ("The cardiac silhouette is mildly enlarged, similar to prior.", {CM: POS, NF: BLANK}),
    ("Heart size is borderline.", {CM: UNC, NF: BLANK}),
    ("Heart size is top-normal.", {CM: UNC, NF: BLANK}),
    ("Cardiomegaly is stable.", {CM: POS, NF: BLANK}),
    ("No cardiomegaly.", {CM: NEG, NF: POS}),
    ("The heart size is upper limits of normal.", {CM: UNC, NF: BLANK}),
    (
        "The heart is massively enlarged, consistent with known dilated cardiomyopathy.",
        {CM: POS, NF: BLANK},
    ),
    ("Heart size remains normal.", {CM: NEG, NF: POS}),
    (
        "The cardiac silhouette is prominent, which may be due to pericardial effusion or "
        "cardiomegaly.",
        {CM: UNC, NF: BLANK},
    ),
    ("Severe enlargement of the cardiac silhouette, unchanged.", {CM: POS, NF: BLANK}),
    ("Heart size is within normal limits.", {CM: NEG, NF: POS}),
    ("Borderline cardiomegaly.", {CM: UNC, NF: BLANK}),
    ("The heart is not significantly enlarged.", {CM: NEG, NF: POS}),
    ("Mildly enlarged heart.", {CM: POS, NF: BLANK}),
    ("The heart size is stable.", {CM: UNC, NF: BLANK}),
    (
        "Enlargement of the cardiac silhouette could reflect cardiomegaly or pericardial effusion.",
        {CM: POS, NF: BLANK},
    ),
    ("Heart size is enlarged but unchanged from the prior exam.", {CM: POS, NF: BLANK}),
    # ------------------------------------------------------------------ lung opacity
    ("Patchy opacity in the right lower lobe.", {OPAC: POS, NF: BLANK}),
    ("Bibasilar opacities.", {OPAC: POS, NF: BLANK}),
    ("There is increased opacification of the left lung base.", {OPAC: POS, NF: BLANK}),
    ("Hazy opacity in the right upper lung zone.", {OPAC: POS, NF: BLANK}),
    ("No focal airspace opacities.", {OPAC: NEG, NF: POS}),
    ("Streaky left basilar opacities, likely atelectasis.", {OPAC: POS, ATEL: UNC, NF: BLANK}),
    (
        "Diffuse interstitial opacities, which could represent atypical infection or edema.",
        {OPAC: POS, PNA: UNC, EDEMA: UNC, NF: BLANK},
    ),
    ("Increased interstitial markings are chronic.", {OPAC: POS, NF: BLANK}),
    (
        "Ill-defined opacity in the left mid lung may represent superimposed vessels.",
        {OPAC: UNC, NF: BLANK},
    ),
    ("Left retrocardiac opacity persists.", {OPAC: POS, NF: BLANK}),
    ("Minimal linear scarring at the left base.", {OPAC: POS, NF: BLANK}),
    ("There is new airspace disease in the right middle lobe.", {OPAC: POS, NF: BLANK}),
    ("Bilateral ground-glass opacities.", {OPAC: POS, NF: BLANK}),
    ("Right upper lobe opacity has resolved.", {OPAC: NEG, NF: POS}),
    ("Mild hazy opacification of the left hemithorax is unchanged.", {OPAC: POS, NF: BLANK}),
    ("Lungs are otherwise clear.", {OPAC: NEG, NF: POS}),
    # ------------------------------------------------------------------ lung lesion
    ("A 1.2 cm nodule projects over the right mid lung.", {LES: POS, NF: BLANK}),
    ("No suspicious pulmonary nodules or masses.", {LES: NEG, NF: POS}),
    (
        "Possible nodular opacity in the left upper lobe, recommend CT for further evaluation.",
        {LES: UNC, NF: BLANK},
    ),
    ("Large right hilar mass.", {LES: POS, NF: BLANK}),
    ("Calcified granuloma in the left upper lobe.", {NF: BLANK}),
    ("Known right upper lobe lung cancer.", {LES: POS, NF: BLANK}),
    ("Multiple pulmonary nodules consistent with metastatic disease.", {LES: POS, NF: BLANK}),
    (
        "The previously noted right lower lobe nodule is not seen on today's study.",
        {LES: NEG, NF: POS},
    ),
    (
        "Nipple shadows are seen bilaterally, no definite pulmonary nodule.",
        {LES: NEG, NF: POS},
    ),
    (
        "Cavitary lesion in the right upper lobe, concerning for malignancy versus infection.",
        {LES: POS, PNA: UNC, NF: BLANK},
    ),
    ("Lytic lesion in the left seventh rib.", {NF: BLANK}),
    ("Left lower lobe mass is again seen.", {LES: POS, NF: BLANK}),
    # ------------------------------------------------------------------ edema
    ("Mild pulmonary edema.", {EDEMA: POS, NF: BLANK}),
    (
        "Moderate interstitial edema with small bilateral pleural effusions.",
        {EDEMA: POS, EFF: POS, NF: BLANK},
    ),
    ("No pulmonary edema.", {EDEMA: NEG, NF: POS}),
    ("Mild pulmonary vascular congestion without overt edema.", {EDEMA: UNC, NF: BLANK}),
    (
        "Perihilar haziness and Kerley B lines compatible with interstitial edema.",
        {EDEMA: POS, NF: BLANK},
    ),
    ("Findings are consistent with mild congestive heart failure.", {EDEMA: POS, NF: BLANK}),
    ("Resolution of pulmonary edema.", {EDEMA: NEG, NF: POS}),
    ("Pulmonary vascular engorgement has increased.", {EDEMA: UNC, NF: BLANK}),
    ("Pulmonary vasculature is normal.", {EDEMA: NEG, NF: POS}),
    (
        "Cephalization of the pulmonary vessels suggests elevated venous pressure.",
        {EDEMA: UNC, NF: BLANK},
    ),
    ("Edema has improved but persists at the lung bases.", {EDEMA: POS, NF: BLANK}),
    ("Possible mild pulmonary edema.", {EDEMA: UNC, NF: BLANK}),
    (
        "Bilateral perihilar airspace shadowing, in keeping with pulmonary oedema.",
        {OPAC: POS, EDEMA: POS, NF: BLANK},
    ),
    ("Pulmonary oedema cannot be excluded.", {EDEMA: UNC, NF: BLANK}),
    ("Pulmonary edema is no longer present.", {EDEMA: NEG, NF: POS}),
    ("Findings are suggestive of early pulmonary edema.", {EDEMA: UNC, NF: BLANK}),
    # ------------------------------------------------------------------ consolidation
    ("Dense consolidation in the left lower lobe.", {CONS: POS, NF: BLANK}),
    ("No focal consolidation.", {CONS: NEG, NF: POS}),
    ("No focal airspace consolidation.", {CONS: NEG, NF: POS}),
    (
        "Right middle lobe consolidation compatible with pneumonia.",
        {CONS: POS, PNA: POS, NF: BLANK},
    ),
    (
        "Retrocardiac consolidation may reflect atelectasis or aspiration.",
        {CONS: POS, ATEL: UNC, NF: BLANK},
    ),
    ("Patchy consolidation in the right lung base is new.", {CONS: POS, NF: BLANK}),
    ("No new focal consolidation.", {CONS: UNC, NF: BLANK}),
    ("Consolidation in the lingula has nearly resolved.", {CONS: POS, NF: BLANK}),
    (
        "Airspace consolidation in the right upper lobe is concerning for pneumonia.",
        {CONS: POS, PNA: UNC, NF: BLANK},
    ),
    # ------------------------------------------------------------------ pneumonia
    ("Right lower lobe pneumonia.", {PNA: POS, NF: BLANK}),
    ("No evidence of pneumonia.", {PNA: NEG, NF: POS}),
    (
        "Opacity in the left lower lobe could represent pneumonia in the appropriate clinical "
        "setting.",
        {OPAC: POS, PNA: UNC, NF: BLANK},
    ),
    ("Findings suspicious for multifocal pneumonia.", {PNA: UNC, NF: BLANK}),
    ("Pneumonia cannot be excluded.", {PNA: UNC, NF: BLANK}),
    ("Bibasilar atelectasis; infection is not excluded.", {ATEL: POS, PNA: UNC, NF: BLANK}),
    ("Interval improvement in left lower lobe pneumonia.", {PNA: POS, NF: BLANK}),
    ("No radiographic findings to suggest pneumonia.", {PNA: NEG, NF: POS}),
    (
        "Patchy right basilar opacity, atelectasis versus early pneumonia.",
        {OPAC: POS, ATEL: UNC, PNA: UNC, NF: BLANK},
    ),
    ("Left lower lobe opacity is concerning for infection.", {OPAC: POS, PNA: UNC, NF: BLANK}),
    ("Resolved right middle lobe pneumonia.", {PNA: NEG, NF: POS}),
    ("Atypical infection versus pulmonary edema.", {PNA: UNC, EDEMA: UNC, NF: BLANK}),
    ("Aspiration pneumonia is a consideration.", {PNA: UNC, NF: BLANK}),
    ("Worsening multifocal pneumonia.", {PNA: POS, NF: BLANK}),
    # ------------------------------------------------------------------ atelectasis
    ("Mild bibasilar atelectasis.", {ATEL: POS, NF: BLANK}),
    ("Linear atelectasis at the left lung base.", {ATEL: POS, NF: BLANK}),
    ("Plate-like atelectasis in the right midlung.", {ATEL: POS, NF: BLANK}),
    (
        "Subsegmental atelectasis versus scarring in the lingula.",
        {ATEL: UNC, OPAC: UNC, NF: BLANK},
    ),
    ("The lungs are well expanded without atelectasis.", {ATEL: NEG, NF: POS}),
    ("Left lower lobe collapse.", {ATEL: POS, NF: BLANK}),
    (
        "Right upper lobe collapse has resolved following bronchoscopy.",
        {ATEL: NEG, NF: POS},
    ),
    ("Atelectatic changes at both bases.", {ATEL: POS, NF: BLANK}),
    ("Opacity at the right base likely reflects atelectasis.", {OPAC: POS, ATEL: UNC, NF: BLANK}),
    (
        "Persistent left basilar opacity, most likely atelectasis, although pneumonia cannot be "
        "excluded.",
        {OPAC: POS, ATEL: UNC, PNA: UNC, NF: BLANK},
    ),
    ("Minimal dependent atelectasis at the lung bases.", {ATEL: POS, NF: BLANK}),
    # ------------------------------------------------------------------ pneumothorax
    ("No pneumothorax.", {PTX: NEG, NF: POS}),
    ("Small right apical pneumothorax.", {PTX: POS, NF: BLANK}),
    ("Tiny left apical pneumothorax is unchanged.", {PTX: POS, NF: BLANK}),
    (
        "There is no evidence of pneumothorax following chest tube removal.",
        {PTX: NEG, SD: NEG, NF: POS},
    ),
    (
        "Moderate right pneumothorax with partial collapse of the right lung.",
        {PTX: POS, ATEL: POS, NF: BLANK},
    ),
    ("Possible small left apical pneumothorax.", {PTX: UNC, NF: BLANK}),
    (
        "A thin visceral pleural line is seen at the right apex, compatible with a small "
        "pneumothorax.",
        {PTX: POS, NF: BLANK},
    ),
    ("No visible pleural line to suggest pneumothorax.", {PTX: NEG, NF: POS}),
    ("The right pneumothorax has resolved.", {PTX: NEG, NF: POS}),
    (
        "Pneumothorax is not well evaluated on this supine radiograph.",
        {PTX: UNC, NF: BLANK},
    ),
    ("Left basilar hydropneumothorax.", {PTX: POS, EFF: POS, NF: BLANK}),
    (
        "Small anterior pneumothorax cannot be excluded on this supine film.",
        {PTX: UNC, NF: BLANK},
    ),
    (
        "Left chest tube has been removed with a tiny residual left apical pneumothorax.",
        {SD: NEG, PTX: POS, NF: BLANK},
    ),
    # ------------------------------------------------------------------ pleural effusion
    ("Small left pleural effusion.", {EFF: POS, NF: BLANK}),
    ("Bilateral pleural effusions, right greater than left.", {EFF: POS, NF: BLANK}),
    ("No pleural effusion.", {EFF: NEG, NF: POS}),
    (
        "Trace right pleural effusion versus pleural thickening.",
        {EFF: UNC, PO: UNC, NF: BLANK},
    ),
    (
        "Blunting of the left costophrenic angle may reflect a small effusion.",
        {EFF: UNC, NF: BLANK},
    ),
    ("The costophrenic angles are sharp.", {EFF: NEG, NF: POS}),
    (
        "Moderate layering left effusion with adjacent compressive atelectasis.",
        {EFF: POS, ATEL: POS, NF: BLANK},
    ),
    ("Small bilateral effusions have decreased in size.", {EFF: POS, NF: BLANK}),
    ("Fluid tracks along the minor fissure.", {EFF: POS, NF: BLANK}),
    ("Small right pleural effusion has resolved.", {EFF: NEG, NF: POS}),
    ("Pleural effusions are not seen.", {EFF: NEG, NF: POS}),
    ("Small amount of pleural fluid at the right base.", {EFF: POS, NF: BLANK}),
    ("No large pleural effusion.", {EFF: NEG, NF: POS}),
    (
        "Left effusion is slightly smaller, and a small right effusion persists.",
        {EFF: POS, NF: BLANK},
    ),
    ("Blunted right costophrenic angle.", {EFF: UNC, NF: BLANK}),
    ("Questionable small right pleural effusion.", {EFF: UNC, NF: BLANK}),
    ("No significant interval change in the small left pleural effusion.", {EFF: POS, NF: BLANK}),
    # ------------------------------------------------------------------ pleural other
    ("Biapical pleural thickening.", {PO: POS, NF: BLANK}),
    (
        "Calcified pleural plaques consistent with prior asbestos exposure.",
        {PO: POS, NF: BLANK},
    ),
    ("Right apical pleural-parenchymal scarring is unchanged.", {PO: POS, NF: BLANK}),
    ("Mild pulmonary fibrosis at the lung bases.", {PO: POS, NF: BLANK}),
    ("No pleural thickening.", {PO: NEG, NF: POS}),
    (
        "Blunting of the right costophrenic angle likely reflects pleural thickening rather than "
        "effusion.",
        {PO: UNC, EFF: UNC, NF: BLANK},
    ),
    ("Stable biapical scarring.", {PO: POS, NF: BLANK}),
    # ------------------------------------------------------------------ fracture
    ("Acute fracture of the left seventh rib.", {FX: POS, NF: BLANK}),
    ("No displaced rib fractures.", {FX: NEG, NF: POS}),
    ("Healed right rib fractures.", {FX: POS, NF: BLANK}),
    ("Osseous structures are intact.", {FX: NEG, NF: POS}),
    ("Old healed left clavicular fracture.", {FX: POS, NF: BLANK}),
    ("No acute osseous abnormality.", {FX: NEG, NF: POS}),
    ("Possible nondisplaced fracture of the right posterior eighth rib.", {FX: UNC, NF: BLANK}),
    (
        "Cortical discontinuity of the lateral left fifth rib concerning for an acute fracture.",
        {FX: POS, NF: BLANK},
    ),
    (
        "Compression deformity of a midthoracic vertebral body, age indeterminate.",
        {NF: BLANK},
    ),
    ("Rib fractures are not identified.", {FX: NEG, NF: POS}),
    ("Mild degenerative changes in the thoracic spine.", {NF: BLANK}),
    ("Displaced fracture of the right clavicle is again noted.", {FX: POS, NF: BLANK}),
    # ------------------------------------------------------------------ support devices
    ("Endotracheal tube terminates 4 cm above the carina.", {SD: POS, NF: POS}),
    ("Right internal jugular central venous catheter tip in the mid SVC.", {SD: POS, NF: POS}),
    ("Left subclavian PICC line with tip in the cavoatrial junction.", {SD: POS, NF: POS}),
    (
        "Nasogastric tube courses below the diaphragm, tip not visualized.",
        {SD: POS, NF: POS},
    ),
    (
        "Dual-chamber pacemaker with leads in the right atrium and right ventricle.",
        {SD: POS, NF: POS},
    ),
    ("Median sternotomy wires and mediastinal clips from prior CABG.", {SD: POS, NF: POS}),
    ("The endotracheal tube has been removed.", {SD: NEG, NF: POS}),
    ("Interval removal of the right chest tube. No pneumothorax.", {SD: NEG, PTX: NEG, NF: POS}),
    ("Left chest wall pacemaker device.", {SD: POS, NF: POS}),
    ("Post-surgical changes of prior left upper lobectomy.", {SD: POS, NF: POS}),
    ("Enteric tube tip is in the stomach.", {SD: POS, NF: POS}),
    ("Lines and tubes are in standard position.", {SD: POS, NF: POS}),
    ("Overlying EKG leads.", {NF: POS}),
    (
        "The patient has been extubated and the nasogastric tube has been removed.",
        {SD: NEG, NF: POS},
    ),
    ("Right IJ line tip in the SVC.", {SD: POS, NF: POS}),
    ("Prior right upper lobectomy with expected postsurgical changes.", {SD: POS, NF: POS}),
    ("Tracheostomy tube in place.", {SD: POS, NF: POS}),
    ("Left-sided Port-A-Cath with tip at the cavoatrial junction.", {SD: POS, NF: POS}),
    ("Possible surgical clips in the right upper quadrant.", {SD: UNC, NF: POS}),
    (
        "Tubular density projecting over the mid esophagus, possibly an esophageal stent.",
        {SD: UNC, NF: POS},
    ),
    # ------------------------------------------------------------------ negation / uncertainty
    (
        "No pleural effusion, pneumothorax, or focal consolidation.",
        {EFF: NEG, PTX: NEG, CONS: NEG, NF: POS},
    ),
    (
        "There is no evidence of focal consolidation, pleural effusion, pulmonary edema, or "
        "pneumothorax.",
        {CONS: NEG, EFF: NEG, EDEMA: NEG, PTX: NEG, NF: POS},
    ),
    ("Left lower lobe opacity, which has partially resolved.", {OPAC: POS, NF: BLANK}),
    (
        "Lungs are clear except for minimal left basilar atelectasis.",
        {OPAC: NEG, ATEL: POS, NF: BLANK},
    ),
    (
        "There is no pleural effusion and there is a small right pneumothorax.",
        {EFF: NEG, PTX: POS, NF: BLANK},
    ),
    (
        "The lungs are clear, there is no pleural effusion, and the heart is mildly enlarged.",
        {OPAC: NEG, EFF: NEG, CM: POS, NF: BLANK},
    ),
    (
        "Right basilar opacity without air bronchograms, favored to represent atelectasis.",
        {OPAC: POS, ATEL: UNC, NF: BLANK},
    ),
    ("No pneumothorax is seen and the heart is enlarged.", {PTX: NEG, CM: POS, NF: BLANK}),
    (
        "Bibasilar opacities may reflect atelectasis or pneumonia.",
        {OPAC: POS, ATEL: UNC, PNA: UNC, NF: BLANK},
    ),
    ("? left lower lobe consolidation", {CONS: UNC, NF: BLANK}),
    (
        "Mild bibasilar atelectasis. No definite focal consolidation, although early pneumonia "
        "is difficult to exclude.",
        {ATEL: POS, CONS: NEG, PNA: UNC, NF: BLANK},
    ),
    (
        "The heart is normal in size. There are low lung volumes with bronchovascular crowding. "
        "No definite focal consolidation, although a small left effusion is possible.",
        {CM: NEG, CONS: NEG, EFF: UNC, NF: BLANK},
    ),
    ("Hilar lymphadenopathy.", {NF: BLANK}),
    ("Small hiatal hernia.", {NF: BLANK}),
    ("Heart size is normal. Stable calcified left hilar lymph nodes.", {CM: NEG, NF: BLANK}),
    (
        "Hyperinflated lungs consistent with COPD. No acute cardiopulmonary process.",
        {NF: BLANK},
    ),
    ("Pleural effusion and pneumothorax are absent.", {EFF: NEG, PTX: NEG, NF: POS}),
    (
        "Cardiomegaly is present and no pneumothorax is identified.",
        {CM: POS, PTX: NEG, NF: BLANK},
    ),
    # ------------------------------------------------------------------ mixed reports
    (
        "Heart size is enlarged. There is mild pulmonary edema with small bilateral pleural "
        "effusions. No pneumothorax.",
        {CM: POS, EDEMA: POS, EFF: POS, PTX: NEG, NF: BLANK},
    ),
    (
        "Portable AP chest. Endotracheal tube tip 5 cm above the carina. Nasogastric tube in "
        "the stomach. Left basilar opacity likely atelectasis. No pneumothorax.",
        {SD: POS, OPAC: POS, ATEL: UNC, PTX: NEG, NF: BLANK},
    ),
    (
        "Stable cardiomegaly. Bibasilar atelectasis. No focal consolidation or pleural effusion.",
        {CM: POS, ATEL: POS, CONS: NEG, EFF: NEG, NF: BLANK},
    ),
    (
        "Right lower lobe consolidation with air bronchograms consistent with pneumonia. Small "
        "right parapneumonic effusion. The left lung is clear.",
        {CONS: POS, PNA: POS, EFF: POS, OPAC: NEG, NF: BLANK},
    ),
    (
        "Compared to the prior study, the left pleural effusion has increased in size. "
        "Persistent retrocardiac opacity could be atelectasis or consolidation. The heart size "
        "is stable.",
        {EFF: POS, OPAC: POS, ATEL: UNC, CONS: UNC, CM: UNC, NF: BLANK},
    ),
    (
        "Moderate cardiomegaly with pulmonary vascular congestion and mild interstitial edema. "
        "Small bilateral pleural effusions. Median sternotomy wires are intact.",
        {CM: POS, EDEMA: POS, EFF: POS, SD: POS, NF: BLANK},
    ),
    (
        "There is a right-sided chest tube. Small residual right apical pneumothorax. "
        "Subcutaneous emphysema along the right chest wall.",
        {SD: POS, PTX: POS, NF: BLANK},
    ),
    (
        "Left upper lobe mass with associated post-obstructive atelectasis. Small left pleural "
        "effusion.",
        {LES: POS, ATEL: POS, EFF: POS, NF: BLANK},
    ),
    (
        "Heart size is normal. Mediastinal and hilar contours are unremarkable. Nodular opacity "
        "in the right lower lobe measuring 8 mm. No pleural effusion.",
        {CM: NEG, ECM: NEG, LES: POS, EFF: NEG, NF: BLANK},
    ),
    (
        "Multiple acute left rib fractures with a small left pneumothorax and adjacent "
        "pulmonary contusion.",
        {FX: POS, PTX: POS, NF: BLANK},
    ),
    (
        "FINDINGS: Single portable view of the chest. Right IJ catheter terminates in the lower "
        "SVC. Low lung volumes. Patchy bibasilar opacities, left greater than right, likely "
        "atelectasis, though aspiration or pneumonia could be considered in the appropriate "
        "clinical setting. No pneumothorax. Heart size is at the upper limits of normal.\n"
        "IMPRESSION: Bibasilar opacities likely atelectasis, though infection not excluded.",
        {SD: POS, OPAC: POS, ATEL: UNC, PNA: UNC, PTX: NEG, CM: UNC, NF: BLANK},
    ),
    (
        "Diffuse bilateral airspace opacities, worse compared to prior, which may represent "
        "worsening pulmonary edema, although superimposed infection cannot be excluded.",
        {OPAC: POS, EDEMA: UNC, PNA: UNC, NF: BLANK},
    ),
    (
        "Mild cardiomegaly. No pleural effusion, pneumothorax, or focal consolidation. Mild "
        "degenerative changes of the thoracic spine.",
        {CM: POS, EFF: NEG, PTX: NEG, CONS: NEG, NF: BLANK},
    ),
    (
        "Tracheostomy tube in place. Stable right lower lobe opacity, which may represent "
        "scarring.",
        {SD: POS, OPAC: POS, NF: BLANK},
    ),
    (
        "AP portable upright view of the chest. Left-sided pacemaker with leads terminating in "
        "the right atrium and right ventricle. Heart size is mildly enlarged. There is mild "
        "pulmonary vascular congestion. Small bilateral pleural effusions with bibasilar "
        "atelectasis. No pneumothorax.",
        {SD: POS, CM: POS, EDEMA: UNC, EFF: POS, ATEL: POS, PTX: NEG, NF: BLANK},
    ),
    (
        "The lungs are hyperinflated. There is a 2 cm spiculated mass in the right upper lobe "
        "concerning for malignancy. No pleural effusion. Heart size is normal.",
        {LES: POS, EFF: NEG, CM: NEG, NF: BLANK},
    ),
    (
        "Interval placement of a left chest tube with decrease in size of the left pneumothorax. "
        "Left lower lobe atelectasis is improved. No right pleural effusion.",
        {SD: POS, PTX: POS, ATEL: POS, EFF: NEG, NF: BLANK},
    ),
    (
        "Low lung volumes. Right basilar opacity may represent atelectasis, aspiration, or "
        "pneumonia. Cardiomediastinal silhouette is stable. No pulmonary edema.",
        {OPAC: POS, ATEL: UNC, PNA: UNC, ECM: UNC, EDEMA: NEG, NF: BLANK},
    ),
    (
        "Status post median sternotomy and CABG. Cardiac silhouette is enlarged. Lungs are "
        "clear. No pleural effusion or pneumothorax.",
        {SD: POS, CM: POS, OPAC: NEG, EFF: NEG, PTX: NEG, NF: BLANK},
    ),
    (
        "Bilateral hazy perihilar opacities with indistinct pulmonary vessels suggesting "
        "moderate pulmonary edema. Small right pleural effusion.",
        {OPAC: POS, EDEMA: UNC, EFF: POS, NF: BLANK},
    ),
    (
        "There is a moderate right pneumothorax. The right chest tube has been removed. Heart "
        "size and mediastinal contours are stable.",
        {PTX: POS, SD: NEG, CM: UNC, ECM: UNC, NF: BLANK},
    ),
    (
        "No acute cardiopulmonary process. Calcified granulomas are noted in the left lung. "
        "Thoracic aorta is tortuous.",
        {NF: BLANK},
    ),
    (
        "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax. "
        "Heart size is normal. Healing fracture of the right sixth rib.",
        {OPAC: NEG, CONS: NEG, EFF: NEG, PTX: NEG, CM: NEG, FX: POS, NF: BLANK},
    ),
    (
        "Left lower lobe opacity has increased, concerning for pneumonia. Small left pleural "
        "effusion is also likely present.",
        {OPAC: POS, PNA: UNC, EFF: UNC, NF: BLANK},
    ),
    (
        "Moderate to large right pleural effusion with adjacent atelectasis; underlying "
        "consolidation cannot be excluded.",
        {EFF: POS, ATEL: POS, CONS: UNC, NF: BLANK},
    ),
    (
        "Feeding tube terminates in the duodenum. Lungs are clear. No effusion.",
        {SD: POS, OPAC: NEG, EFF: NEG, NF: POS},
    ),
    (
        "No evidence of acute disease. Heart size is upper normal. Lungs are clear. Minimal "
        "degenerative change of the thoracic spine.",
        {CM: UNC, OPAC: NEG, NF: BLANK},
    ),
    # ------------------------------------------------------------------ second batch
    # Written after the rules above were tuned, and run once before any rule change, as a
    # generalization check: 52 of 55 were right on the first pass. The three misses (a nodule
    # "likely a nipple shadow", "mass-like consolidation", "fractures could be missed") led to
    # the mimic / "mass-like" / "could be missed" rules.
    (
        "The lungs are clear. There is no pleural effusion or pneumothorax. The heart is not "
        "enlarged. Mediastinal contours are unremarkable.",
        {OPAC: NEG, EFF: NEG, PTX: NEG, CM: NEG, ECM: NEG, NF: POS},
    ),
    (
        "Heart size is mildly enlarged. Aorta is tortuous. Mild pulmonary vascular congestion. No "
        "focal consolidation.",
        {CM: POS, EDEMA: UNC, CONS: NEG, NF: BLANK},
    ),
    (
        "Interval increase in moderate right pleural effusion with associated compressive "
        "atelectasis.",
        {EFF: POS, ATEL: POS, NF: BLANK},
    ),
    (
        "There is a left retrocardiac opacity which may represent atelectasis, though "
        "consolidation is not excluded.",
        {OPAC: POS, ATEL: UNC, CONS: UNC, NF: BLANK},
    ),
    (
        "Right PICC terminates at the cavoatrial junction. No pneumothorax. Lungs are clear.",
        {SD: POS, PTX: NEG, OPAC: NEG, NF: POS},
    ),
    ("Increased bibasilar opacities are concerning for aspiration.", {OPAC: POS, NF: BLANK}),
    ("No acute cardiopulmonary process. Unchanged mild cardiomegaly.", {CM: POS, NF: BLANK}),
    (
        "The ET tube tip is 3 cm above the carina. The NG tube tip is in the stomach. There is "
        "mild pulmonary edema.",
        {SD: POS, EDEMA: POS, NF: BLANK},
    ),
    ("Lung volumes are low, which accentuates the bronchovascular markings.", {NF: POS}),
    (
        "Small right apical pneumothorax is slightly smaller compared to the prior radiograph.",
        {PTX: POS, NF: BLANK},
    ),
    (
        "There is no focal consolidation. Mild blunting of the left costophrenic angle is "
        "unchanged, likely from pleural thickening.",
        {CONS: NEG, EFF: UNC, PO: UNC, NF: BLANK},
    ),
    (
        "Biapical pleural-parenchymal scarring. Calcified mediastinal lymph nodes.",
        {PO: POS, NF: BLANK},
    ),
    (
        "A nodular opacity projecting over the left lower lung likely represents a nipple shadow.",
        {LES: UNC, NF: BLANK},
    ),
    (
        "Moderate to severe cardiomegaly, stable. Sternotomy wires intact. No edema.",
        {CM: POS, SD: POS, EDEMA: NEG, NF: BLANK},
    ),
    (
        "Patchy airspace opacities in the right upper and lower lobes, compatible with multifocal "
        "pneumonia.",
        {OPAC: POS, PNA: POS, NF: BLANK},
    ),
    ("There is a new small left pleural effusion.", {EFF: POS, NF: BLANK}),
    (
        "No new consolidation, effusion, or pneumothorax.",
        {CONS: UNC, EFF: UNC, PTX: UNC, NF: BLANK},
    ),
    (
        "Heart size is at the upper limit of normal. Lungs are clear.",
        {CM: UNC, OPAC: NEG, NF: BLANK},
    ),
    (
        "Mild interstitial prominence, which may reflect mild interstitial edema or chronic "
        "changes.",
        {OPAC: POS, EDEMA: UNC, NF: BLANK},
    ),
    ("Left lower lobe consolidation has progressed.", {CONS: POS, NF: BLANK}),
    (
        "There is no evidence of pneumothorax after thoracentesis. Small residual left pleural "
        "effusion.",
        {PTX: NEG, EFF: POS, NF: BLANK},
    ),
    ("Severe degenerative changes of the bilateral shoulders.", {NF: BLANK}),
    ("Right basilar atelectasis has improved.", {ATEL: POS, NF: BLANK}),
    (
        "The left-sided chest tube is in unchanged position, and there is no pneumothorax.",
        {SD: POS, PTX: NEG, NF: POS},
    ),
    ("Findings suggest a left lower lobe pneumonia.", {PNA: UNC, NF: BLANK}),
    ("Stable position of the right internal jugular central line.", {SD: POS, NF: POS}),
    ("Hyperinflation with flattening of the diaphragms consistent with emphysema.", {NF: BLANK}),
    ("Fracture deformity of the right clavicle is unchanged.", {FX: POS, NF: BLANK}),
    ("Irregularity of the left 5th and 6th ribs suggests old fractures.", {FX: UNC, NF: BLANK}),
    (
        "There is mild enlargement of the cardiac silhouette with pulmonary vascular engorgement "
        "and bilateral perihilar haziness, consistent with congestive heart failure.",
        {CM: POS, EDEMA: POS, NF: BLANK},
    ),
    (
        "No pleural effusions. No pneumothorax. No pulmonary edema. The heart is normal in size.",
        {EFF: NEG, PTX: NEG, EDEMA: NEG, CM: NEG, NF: POS},
    ),
    (
        "Right lower lobe mass-like consolidation; malignancy cannot be excluded.",
        {CONS: POS, LES: UNC, NF: BLANK},
    ),
    ("Left upper lobe collapse with leftward mediastinal shift.", {ATEL: POS, NF: BLANK}),
    (
        "Both lungs are clear. Heart and mediastinum are normal. Bony thorax is intact.",
        {OPAC: NEG, CM: NEG, ECM: NEG, FX: NEG, NF: POS},
    ),
    ("The cardiomediastinal silhouette is enlarged but unchanged.", {ECM: POS, NF: BLANK}),
    ("Bilateral upper lobe predominant fibrotic changes are again seen.", {PO: POS, NF: BLANK}),
    (
        "Persistent small left pneumothorax with a left pigtail catheter in place.",
        {PTX: POS, SD: POS, NF: BLANK},
    ),
    (
        "Subtle opacity at the right lung base may represent early pneumonia in the correct "
        "clinical setting.",
        {OPAC: POS, PNA: UNC, NF: BLANK},
    ),
    (
        "There is no definite evidence of rib fracture, however, dedicated rib views are more "
        "sensitive.",
        {FX: NEG, NF: POS},
    ),
    (
        "The lungs are clear without focal consolidation, pleural effusion, or pneumothorax. "
        "Normal cardiomediastinal silhouette.",
        {OPAC: NEG, CONS: NEG, EFF: NEG, PTX: NEG, ECM: NEG, NF: POS},
    ),
    (
        "Multiple bilateral pulmonary nodules have increased in size and number.",
        {LES: POS, NF: BLANK},
    ),
    (
        "The tip of the Swan-Ganz catheter is in the right main pulmonary artery.",
        {SD: POS, NF: POS},
    ),
    (
        "Retrocardiac opacity obscures the left hemidiaphragm, consistent with left lower lobe "
        "atelectasis and/or consolidation.",
        {OPAC: POS, ATEL: UNC, CONS: UNC, NF: BLANK},
    ),
    (
        "No displaced fracture is seen, though nondisplaced rib fractures could be missed on "
        "radiograph.",
        {FX: UNC, NF: BLANK},
    ),
    (
        "Dense retrocardiac opacification, which could reflect atelectasis, effusion, or "
        "consolidation.",
        {OPAC: POS, ATEL: UNC, EFF: UNC, CONS: UNC, NF: BLANK},
    ),
    ("Trachea is midline. No mediastinal widening.", {ECM: NEG, NF: POS}),
    ("Granulomatous calcifications in the right hilum.", {NF: BLANK}),
    (
        "There is an ill-defined opacity in the right middle lobe, not seen on the prior study, "
        "concerning for pneumonia.",
        {OPAC: POS, PNA: UNC, NF: BLANK},
    ),
    (
        "Small bilateral pleural effusions are unchanged. No evidence of pulmonary edema.",
        {EFF: POS, EDEMA: NEG, NF: BLANK},
    ),
    (
        "Stable appearance of a left basilar opacity, likely scarring or atelectasis.",
        {OPAC: POS, ATEL: UNC, NF: BLANK},
    ),
    (
        "Heart size is normal. There is no pneumothorax, but there is a small right pleural "
        "effusion.",
        {CM: NEG, PTX: NEG, EFF: POS, NF: BLANK},
    ),
    ("Worsening left pleural effusion, now moderate in size.", {EFF: POS, NF: BLANK}),
    ("Dobhoff tube with tip in the proximal duodenum.", {SD: POS, NF: POS}),
    (
        "Cardiac pacemaker leads terminate in the right atrium and ventricle, unchanged.",
        {SD: POS, NF: POS},
    ),
    ("Mild central vascular congestion has resolved.", {EDEMA: NEG, NF: POS}),
]


def expected_vector(expected: dict[str, int], observations: tuple[str, ...]) -> list[int]:
    """The 14 expected codes, in ``observations`` order, from a sparse expectation dict."""
    unknown = set(expected) - set(observations)
    if unknown:
        raise KeyError(f"unknown observations {sorted(unknown)}")
    return [expected.get(name, BLANK) for name in observations]
